// graftlib diff page: open the site named in the URL hash; expand / collapse all
function openHash(){var e=document.getElementById(location.hash.slice(1));
if(e&&e.tagName==='DETAILS'){e.open=true;e.scrollIntoView({block:'start'});}}
window.addEventListener('hashchange',openHash);openHash();
function setAll(v){document.querySelectorAll('details.site').forEach(function(d){d.open=v;});}
